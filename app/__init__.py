"""The segmap MONAI Deploy application (the MAP payload)."""
