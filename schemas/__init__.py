"""synpref.schemas"""
