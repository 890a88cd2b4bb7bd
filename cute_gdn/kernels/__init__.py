"""CuTe DSL device code for Hopper (sm_90a). Imports cutlass, never torch."""
