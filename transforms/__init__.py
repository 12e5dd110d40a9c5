"""synpref.transforms"""
