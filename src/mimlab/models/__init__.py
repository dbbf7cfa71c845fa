"""Models: build timm models by name, import checkpoints, and describe their token layout."""
