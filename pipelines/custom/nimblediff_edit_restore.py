from nimblediff.pipelines.editing import RestorePipeline  # noqa: F401  (the one class diffusers will pick)
