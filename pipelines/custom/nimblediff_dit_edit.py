from nimblediff.pipelines.dit_edit import DiTEditPipeline  # noqa: F401  (the one class diffusers will pick)
