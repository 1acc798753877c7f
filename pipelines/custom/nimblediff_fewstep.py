from nimblediff.pipelines.fewstep import FewStepPipeline  # noqa: F401  (the one class diffusers will pick)
