"""voxsearch.serve"""
