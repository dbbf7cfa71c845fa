"""Loaders for the real on-disk formats: ImageFolder, COCO keypoints, NYUv2/KITTI depth, GOT-10k/LaSOT tracking."""
