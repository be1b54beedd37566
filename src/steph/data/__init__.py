"""steph.data"""
