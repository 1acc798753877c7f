from nimblediff.pipelines.dit import FewStepPixArtPipeline  # noqa: F401  (the one class diffusers will pick)
