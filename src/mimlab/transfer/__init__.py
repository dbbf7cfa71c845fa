"""Transfer: fine-tune and evaluate a backbone on classification, keypoints, depth and tracking, in the
datasets' real formats (ImageFolder, COCO keypoints, NYUv2/KITTI, GOT-10k/LaSOT), through the shared engine.

- `api.run_transfer(TransferConfig(task, backbone, data, out, ...))` -> the `metrics.json` dict (see `api`).
- `tasks.TASKS`: each task's main metric, trivial baseline and default optimisation.
- `backbone`, `heads`, `losses`, `metrics`, `datasets`, `tasks`: the parts. (The built-in datasets written in those
  formats are `mimlab.data.downstream`.)
"""
