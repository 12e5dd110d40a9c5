"""synpref.jobs"""
