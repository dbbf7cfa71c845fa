"""Transfer metrics: classification, keypoints (OKS AP via pycocotools), depth, tracking (OPE)."""
