"""Plain-torch reference for the gated delta rule: the executable form of SPEC.md.

Everything computes in a caller-chosen dtype (float64 by default) so that kernels are compared
against a result whose own rounding error is negligible. Nothing here runs in place: the ops
return new pools and caches, so tests can diff them against their inputs bit for bit.

Layouts (SPEC.md): q, k [B, T, H, K]; v, o [B, T, HV, V]; g, beta, a, b [B, T, HV];
state pool [pool_size, HV, V, K] (K-last); cache [cache_slots, cache_steps, HV, V, K].
A state index < 0 is padding: no state read or written, output rows zero.

Two forms of the same math are given, proven equal by the tests: the token-by-token recurrence,
which is the definition, and the chunked WY/UT form, which is what the prefill kernel computes.
"""

import torch

# Above 20, log1p(exp(x)) rounds to x in fp32; torch's softplus (threshold=20) and the serving
# stacks switch branches there, so the kernels must too.
SOFTPLUS_THRESHOLD = 20.0
# Keeps l2norm finite for an all-zero q/k row; SPEC.md's value.
L2NORM_EPS = 1e-6


def compute_gates(
    a: torch.Tensor,  # [..., HV]
    b: torch.Tensor,  # [..., HV]
    A_log: torch.Tensor,  # [HV]
    dt_bias: torch.Tensor,  # [HV]
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw gates -> (g [..., HV] in natural-log space, beta [..., HV]), both in `dtype`."""
    x = a.to(dtype) + dt_bias.to(dtype)
    # The clamp keeps exp() finite in the branch torch.where discards (fp32 exp overflows past
    # ~88), so no inf appears even transiently.
    softplus = torch.where(
        x > SOFTPLUS_THRESHOLD,
        x,
        torch.log1p(torch.exp(x.clamp(max=SOFTPLUS_THRESHOLD))),
    )
    g = -torch.exp(A_log.to(dtype)) * softplus
    beta = torch.sigmoid(b.to(dtype))
    return g, beta


def _resolve_gates(g, beta, a, b, A_log, dt_bias, dtype):
    """Either gate set yields the same (g, beta); mixing them is ambiguous, so it is an error."""
    precomputed = [x is not None for x in (g, beta)]
    raw = [x is not None for x in (a, b, A_log, dt_bias)]
    if all(precomputed) and not any(raw):
        return g.to(dtype), beta.to(dtype)
    if all(raw) and not any(precomputed):
        return compute_gates(a, b, A_log, dt_bias, dtype=dtype)
    raise ValueError("gates: give exactly one of (g, beta) or (a, b, A_log, dt_bias)")


def _l2norm(x: torch.Tensor) -> torch.Tensor:  # [..., K]
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm, dtype):
    """Cast, normalize, scale q, and expand q/k to the HV value heads (GVA)."""
    num_heads, num_v_heads, head_k_dim = q.shape[2], v.shape[2], q.shape[3]
    if num_v_heads % num_heads:
        raise ValueError(f"v: HV={num_v_heads} is not a multiple of H={num_heads}")
    q, k = q.to(dtype), k.to(dtype)
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * (head_k_dim**-0.5 if scale is None else scale)
    # repeat_interleave maps value head h to q/k head h // (HV // H), the SPEC's grouping.
    group = num_v_heads // num_heads
    q = q.repeat_interleave(group, dim=2)
    k = k.repeat_interleave(group, dim=2)
    return q, k, v.to(dtype), g.to(dtype), beta.to(dtype)


def _initial(initial_state, batch, num_v_heads, head_v_dim, head_k_dim, dtype, device):
    if initial_state is None:
        return torch.zeros(batch, num_v_heads, head_v_dim, head_k_dim, dtype=dtype, device=device)
    return initial_state.to(dtype)


def recurrent_gated_delta_rule(
    q: torch.Tensor,  # [B, T, H, K]
    k: torch.Tensor,  # [B, T, H, K]
    v: torch.Tensor,  # [B, T, HV, V]
    g: torch.Tensor,  # [B, T, HV], log-space decay
    beta: torch.Tensor,  # [B, T, HV], after the sigmoid
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,  # [B, HV, V, K]; None = zeros
    use_qk_l2norm: bool = True,
    return_all_states: bool = False,
    dtype: torch.dtype = torch.float64,
):
    """The definition, token by token.

    Returns (o [B, T, HV, V], final_state [B, HV, V, K]) and, with return_all_states, also the
    state after every token [B, T, HV, V, K] (what verify caches). All in `dtype`.
    """
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm, dtype)
    batch, seqlen, num_v_heads, head_v_dim = v.shape
    head_k_dim = q.shape[-1]
    S = _initial(initial_state, batch, num_v_heads, head_v_dim, head_k_dim, dtype, v.device)
    o = v.new_empty(batch, seqlen, num_v_heads, head_v_dim)
    states = []
    # Matrix-vector products as multiply-and-sum: per token they are tiny, and batched GEMM
    # dispatch costs far more than the arithmetic on CPU.
    for t in range(seqlen):
        S = torch.exp(g[:, t])[..., None, None] * S
        u = beta[:, t, :, None] * (v[:, t] - (S * k[:, t, :, None, :]).sum(-1))
        S = S + u[..., :, None] * k[:, t, :, None, :]
        o[:, t] = (S * q[:, t, :, None, :]).sum(-1)
        if return_all_states:
            states.append(S)
    if not return_all_states:
        return o, S
    if states:
        all_states = torch.stack(states, dim=1)
    else:
        all_states = S.new_empty(batch, 0, num_v_heads, head_v_dim, head_k_dim)
    return o, S, all_states


def _unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:  # [..., C, C], strictly lower
    """(I + A)^-1 by forward substitution, row by row, as the kernel does it in shared memory.

    Row i of M = (I + A)^-1 satisfies M[i] + sum_{j<i} A[i, j] M[j] = e_i, and only needs rows
    j < i, which are final by then.
    """
    chunk = A.shape[-1]
    M = torch.eye(chunk, dtype=A.dtype, device=A.device).expand(A.shape).clone()
    for i in range(1, chunk):
        M[..., i, :i] = -(A[..., i, None, :i] @ M[..., :i, :i]).squeeze(-2)
    return M


def chunk_gated_delta_rule(
    q: torch.Tensor,  # [B, T, H, K]
    k: torch.Tensor,  # [B, T, H, K]
    v: torch.Tensor,  # [B, T, HV, V]
    g: torch.Tensor,  # [B, T, HV], log-space decay
    beta: torch.Tensor,  # [B, T, HV], after the sigmoid
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,  # [B, HV, V, K]; None = zeros
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
    dtype: torch.dtype = torch.float64,
):
    """The chunked WY/UT form: what the prefill kernel computes, in plain torch.

    Inside a chunk with cumulative gate G_i = sum_{j<=i} g_j and S0 the state entering it,
    unrolling the recurrence gives S_i = e^{G_i} S0 + sum_{j<=i} e^{G_i - G_j} u_j k_j^T, where
    the delta-rule residuals u solve the unit lower-triangular system
        (I + A) u = beta v - (beta e^{G} k) S0^T,   A_ij = beta_i (k_i . k_j) e^{G_i - G_j}, j < i.
    With M = (I + A)^-1: U = M (beta v) - M (beta e^{G} k) S0^T, both M-products independent
    of S0, so only the small state recurrence is sequential across chunks.

    Returns (o [B, T, HV, V], final_state [B, HV, V, K]) in `dtype`.
    """
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm, dtype)
    batch, seqlen, num_v_heads, head_v_dim = v.shape
    head_k_dim = q.shape[-1]
    S = _initial(initial_state, batch, num_v_heads, head_v_dim, head_k_dim, dtype, v.device)
    num_chunks = -(-seqlen // chunk_size)
    pad = num_chunks * chunk_size - seqlen

    def to_chunks(x):  # [B, T, HV, ...] -> [B, HV, NT, C, ...]
        # Zero padding is exact: beta = 0 makes a padded token's update vanish and g = 0 leaves
        # the decay unchanged, so the state after the last chunk is the one after token T - 1.
        x = torch.cat([x, x.new_zeros((batch, pad) + x.shape[2:])], dim=1)
        x = x.reshape((batch, num_chunks, chunk_size) + x.shape[2:])
        return x.movedim(3, 1)

    q, k, v, g, beta = map(to_chunks, (q, k, v, g, beta))
    G = g.cumsum(-1)  # [B, HV, NT, C]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=v.device).tril()
    # e^{G_i - G_j} for j <= i, zero above the diagonal; masking before exp keeps the (positive)
    # upper-triangle exponents from overflowing.
    decay = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")))
    A = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    M = _unit_lower_inverse(A)
    w = M @ ((beta * torch.exp(G))[..., None] * k)  # [B, HV, NT, C, K]
    u = M @ (beta[..., None] * v)  # [B, HV, NT, C, V]
    attn = (q @ k.transpose(-1, -2)) * decay  # intra-chunk q.k with decay, diagonal included
    q_decayed = torch.exp(G)[..., None] * q
    # e^{G_last - G_j}: how much of token j's update survives to the chunk's end.
    k_to_end = torch.exp(G[..., -1:] - G)[..., None] * k

    o = v.new_empty(batch, num_v_heads, num_chunks, chunk_size, head_v_dim)
    for n in range(num_chunks):
        residual = u[:, :, n] - w[:, :, n] @ S.transpose(-1, -2)  # U: [B, HV, C, V]
        o[:, :, n] = q_decayed[:, :, n] @ S.transpose(-1, -2) + attn[:, :, n] @ residual
        S = torch.exp(G[:, :, n, -1])[..., None, None] * S
        S = S + residual.transpose(-1, -2) @ k_to_end[:, :, n]
    o = o.reshape(batch, num_v_heads, num_chunks * chunk_size, head_v_dim)[:, :, :seqlen]
    return o.transpose(1, 2), S


def prefill(
    q: torch.Tensor,  # [1, T_total, H, K], sequences packed along T
    k: torch.Tensor,  # [1, T_total, H, K]
    v: torch.Tensor,  # [1, T_total, HV, V]
    *,
    g: torch.Tensor | None = None,  # [1, T_total, HV]
    beta: torch.Tensor | None = None,  # [1, T_total, HV]
    a: torch.Tensor | None = None,  # [1, T_total, HV]
    b: torch.Tensor | None = None,  # [1, T_total, HV]
    A_log: torch.Tensor | None = None,  # [HV]
    dt_bias: torch.Tensor | None = None,  # [HV]
    cu_seqlens: torch.Tensor,  # [N + 1]
    state: torch.Tensor,  # [pool_size, HV, V, K]
    state_indices: torch.Tensor,  # [N]
    has_initial_state: torch.Tensor | None = None,  # [N] bool; None = all True
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    chunked: bool = True,
    dtype: torch.dtype = torch.float64,
):
    """Varlen prefill ("extend"). Returns (o [1, T_total, HV, V] in `dtype`, new state pool).

    The new pool is a copy of `state` (same dtype) with each sequence's final state, rounded to
    the pool dtype, written to its slot. A zero-length sequence writes back its initial state
    (zeros where has_initial_state is False), as the kernel's epilogue does.
    """
    g, beta = _resolve_gates(g, beta, a, b, A_log, dt_bias, dtype)
    if q.shape[0] != 1:
        raise ValueError(f"q: prefill packs sequences along T; B must be 1, not {q.shape[0]}")
    run = chunk_gated_delta_rule if chunked else recurrent_gated_delta_rule
    bounds = cu_seqlens.tolist()
    slots = state_indices.tolist()
    has_init = [True] * len(slots) if has_initial_state is None else has_initial_state.tolist()
    o = torch.zeros(v.shape, dtype=dtype, device=v.device)
    new_state = state.clone()
    for n, slot in enumerate(slots):
        if slot < 0:
            continue
        lo, hi = bounds[n], bounds[n + 1]
        seq = slice(lo, hi)
        o[:, seq], final = run(
            q[:, seq],
            k[:, seq],
            v[:, seq],
            g[:, seq],
            beta[:, seq],
            scale=scale,
            initial_state=state[slot : slot + 1] if has_init[n] else None,
            use_qk_l2norm=use_qk_l2norm,
            dtype=dtype,
        )
        new_state[slot] = final[0].to(state.dtype)
    return o, new_state


def decode(
    q: torch.Tensor,  # [B, 1, H, K]
    k: torch.Tensor,  # [B, 1, H, K]
    v: torch.Tensor,  # [B, 1, HV, V]
    *,
    g: torch.Tensor | None = None,  # [B, 1, HV]
    beta: torch.Tensor | None = None,  # [B, 1, HV]
    a: torch.Tensor | None = None,  # [B, 1, HV]
    b: torch.Tensor | None = None,  # [B, 1, HV]
    A_log: torch.Tensor | None = None,  # [HV]
    dt_bias: torch.Tensor | None = None,  # [HV]
    state: torch.Tensor,  # [pool_size, HV, V, K]
    state_indices: torch.Tensor,  # [B]
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    dtype: torch.dtype = torch.float64,
):
    """One token per sequence. Returns (o [B, 1, HV, V] in `dtype`, new state pool)."""
    if q.shape[1] != 1:
        raise ValueError(f"q: decode takes one token per sequence, got T={q.shape[1]}")
    g, beta = _resolve_gates(g, beta, a, b, A_log, dt_bias, dtype)
    live = (state_indices >= 0).nonzero().squeeze(1)
    slots = state_indices[live].long()
    o_live, final = recurrent_gated_delta_rule(
        q[live],
        k[live],
        v[live],
        g[live],
        beta[live],
        scale=scale,
        initial_state=state[slots],
        use_qk_l2norm=use_qk_l2norm,
        dtype=dtype,
    )
    o = torch.zeros(v.shape, dtype=dtype, device=v.device)
    o[live] = o_live
    new_state = state.clone()
    new_state[slots] = final.to(state.dtype)
    return o, new_state


def verify(
    q: torch.Tensor,  # [B, T, H, K]
    k: torch.Tensor,  # [B, T, H, K]
    v: torch.Tensor,  # [B, T, HV, V]
    *,
    g: torch.Tensor | None = None,  # [B, T, HV]
    beta: torch.Tensor | None = None,  # [B, T, HV]
    a: torch.Tensor | None = None,  # [B, T, HV]
    b: torch.Tensor | None = None,  # [B, T, HV]
    A_log: torch.Tensor | None = None,  # [HV]
    dt_bias: torch.Tensor | None = None,  # [HV]
    state: torch.Tensor,  # [pool_size, HV, V, K], read only
    state_indices: torch.Tensor,  # [B]
    cache: torch.Tensor,  # [cache_slots, cache_steps, HV, V, K]
    cache_indices: torch.Tensor | None = None,  # [B]; None = arange(B)
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    dtype: torch.dtype = torch.float64,
):
    """Speculative verify. Returns (o [B, T, HV, V] in `dtype`, new cache).

    new_cache[cache_indices[b], t] is the state after token t, rounded to the cache dtype, so a
    later commit can adopt any accepted prefix without recomputation. Padded rows (state index
    < 0) leave the cache untouched; their cache index is ignored.
    """
    g, beta = _resolve_gates(g, beta, a, b, A_log, dt_bias, dtype)
    batch, seqlen = q.shape[:2]
    if seqlen > cache.shape[1]:
        raise ValueError(f"q: T={seqlen} exceeds cache_steps={cache.shape[1]}")
    if cache_indices is None:
        cache_indices = torch.arange(batch, device=state_indices.device)
    live = (state_indices >= 0).nonzero().squeeze(1)
    slots = state_indices[live].long()
    cache_slots = cache_indices[live].long()
    if bool((cache_slots < 0).any()):
        raise ValueError("cache_indices: negative index for a non-padded row")
    o_live, _, states = recurrent_gated_delta_rule(
        q[live],
        k[live],
        v[live],
        g[live],
        beta[live],
        scale=scale,
        initial_state=state[slots],
        use_qk_l2norm=use_qk_l2norm,
        return_all_states=True,
        dtype=dtype,
    )
    o = torch.zeros(v.shape, dtype=dtype, device=v.device)
    o[live] = o_live
    new_cache = cache.clone()
    new_cache[cache_slots, :seqlen] = states.to(cache.dtype)
    return o, new_cache


def commit(
    state: torch.Tensor,  # [pool_size, HV, V, K]
    state_indices: torch.Tensor,  # [B]
    cache: torch.Tensor,  # [cache_slots, cache_steps, HV, V, K]
    cache_indices: torch.Tensor | None,  # [B]; None = arange(B)
    accepted_steps: torch.Tensor,  # [B] int, 0 .. T
) -> torch.Tensor:
    """Adopt the state after the last accepted token. Returns the new state pool.

    accepted_steps 0 (nothing accepted) leaves the slot as it was, which is the state before the
    verified tokens, since verify never writes the pool.
    """
    if cache_indices is None:
        cache_indices = torch.arange(state_indices.shape[0], device=state_indices.device)
    take = ((accepted_steps >= 1) & (state_indices >= 0)).nonzero().squeeze(1)
    new_state = state.clone()
    steps = accepted_steps[take].long() - 1
    new_state[state_indices[take].long()] = cache[cache_indices[take].long(), steps].to(state.dtype)
    return new_state
