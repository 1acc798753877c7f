from nimblediff.pipelines.dit import FewStepSDXLPipeline  # noqa: F401  (the one class diffusers will pick)
