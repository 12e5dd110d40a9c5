"""synpref.training"""
