"""The penalties, one module each (public function, options, plans, reference Hessian term), on the plan
contract of `base`; `registry.PENALTIES` is the one table of the Hessian-alignment methods. Kept free of
imports, so that importing `base` runs nothing else."""
