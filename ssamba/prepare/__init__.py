"""Official dataset downloads -> the manifests, label csv and normalisation stats the recipes read.

``python -m ssamba.prepare <dataset> --src <download> --dst <folder>``; see ``docs/data.md``.
"""
