"""steph.training"""
