"""histod.db"""
