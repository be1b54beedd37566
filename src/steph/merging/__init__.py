"""steph.merging"""
