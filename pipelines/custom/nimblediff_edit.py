from nimblediff.pipelines.editing import EditPipeline  # noqa: F401  (the one class diffusers will pick)
