"""Transfer: fine-tune and evaluate a backbone on classification, keypoints, depth and tracking, in the
datasets' real formats (ImageFolder, COCO keypoints, NYUv2/KITTI, GOT-10k/LaSOT), through the shared engine.

- `api.run_transfer(task, backbone, data, out, ...)` -> the `metrics.json` dict (see `api`).
- `synthetic.generate(kind, out, ...)`: built-in datasets written in those formats.
- `backbone`, `heads`, `losses`, `metrics`, `datasets`, `tasks`: the parts.
"""
