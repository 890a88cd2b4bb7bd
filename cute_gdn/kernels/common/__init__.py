"""Device-side building blocks shared by the GDN kernels, one module per concept."""
