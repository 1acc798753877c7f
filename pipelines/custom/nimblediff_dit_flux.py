from nimblediff.pipelines.dit import FewStepFluxPipeline  # noqa: F401  (the one class diffusers will pick)
