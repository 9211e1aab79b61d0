"""Synthetic phantoms, small nnU-Net-architecture networks and their plans: the bundled demo and the tests.

Nothing here is for clinical use. Building networks needs ``dynamic-network-architectures`` (installed with the
``test`` extra); the rest of segmap never imports it.
"""
