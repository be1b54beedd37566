"""steph.experiments"""
