"""Sample-quality evaluation: the FID Inception-v3, FID / KID / IS / precision-recall, CLIP
score, autoencoder metrics, sharded feature extraction and reference statistics.

Nothing here downloads weights: Inception and CLIP weights are read from local files.
"""
