from nimblediff.pipelines.compose import ComposePipeline  # noqa: F401  (the one class diffusers will pick)
