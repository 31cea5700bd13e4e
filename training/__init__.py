"""voxsearch.training"""
