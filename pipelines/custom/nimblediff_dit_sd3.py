from nimblediff.pipelines.dit import FewStepSD3Pipeline  # noqa: F401  (the one class diffusers will pick)
