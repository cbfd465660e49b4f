"""Dataset sources: each turns one public dataset's files into `Record` lists per split.

Import from the submodules (`visioncare.data.sources.idrid`, ...).
"""
