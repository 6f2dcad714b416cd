"""The model: loading Z-Image, the mode table and its pipelines, prompts, inpainting's composite,
pixels, the safety checker, and where model files are found."""
