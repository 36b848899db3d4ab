"""histod.trainer"""
