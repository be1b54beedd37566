"""steph.models"""
