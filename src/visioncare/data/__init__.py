"""Data: dataset sources, synthetic generator, preprocessing + cache, transforms, datamodule.

Import from the submodules (`visioncare.data.datamodule`, ...): this package stays import-light
so that worker processes rendering or caching images start fast.
"""
