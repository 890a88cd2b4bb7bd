"""Which bad arguments does the tvm-ffi wrapper reject by itself? One subprocess per case."""
import os, subprocess, sys
CASES = ["ok", "q_misaligned", "q_stride7", "v_batch", "pool_size", "idx_int64", "out_dtype", "a_fp32", "q_fp16",
         "state_noncontig", "idx_noncontig", "k_heads", "state_cpu"]
if len(sys.argv) == 1:
    for c in CASES:
        r = subprocess.run([sys.executable, __file__, c], capture_output=True, text=True, timeout=120)
        print(f"{c:16s} rc={r.returncode} :: {(r.stdout + r.stderr).strip().splitlines()[-1][-260:] if (r.stdout+r.stderr).strip() else ''}", flush=True)
    sys.exit(0)
import torch
sys.path.insert(0, os.getcwd())
from cute_gdn.cache import default_cache
from cute_gdn.ops import decode_key
case = sys.argv[1]
B,H,HV,K,V,P=4,8,16,128,128,160
fn = default_cache().get(decode_key(io_dtype="bfloat16", state_dtype="float32", num_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V, pool_size=P, gate_mode="raw", dt_bias_dtype="float32", use_qk_l2norm=True))
d="cuda"
q=torch.randn(B,1,H,K,dtype=torch.bfloat16,device=d); k=torch.randn_like(q); v=torch.randn(B,1,HV,V,dtype=torch.bfloat16,device=d)
a=torch.randn(B,1,HV,device=d).bfloat16(); b=torch.randn_like(a); A=torch.randn(HV,device=d); dt=torch.randn(HV,device=d)
st=torch.randn(P,HV,V,K,device=d); idx=torch.arange(B,dtype=torch.int32,device=d); o=torch.empty(B,1,HV,V,dtype=torch.bfloat16,device=d)
if case=="q_misaligned": q=torch.randn(B,1,H,K+8,dtype=torch.bfloat16,device=d)[...,1:K+1]
if case=="q_stride7": q=torch.randn(B,1,H,K+4,dtype=torch.bfloat16,device=d)[...,:K]
if case=="v_batch": v=torch.randn(B+1,1,HV,V,dtype=torch.bfloat16,device=d)
if case=="pool_size": st=torch.randn(P+1,HV,V,K,device=d)
if case=="idx_int64": idx=idx.long()
if case=="out_dtype": o=o.half()
if case=="a_fp32": a=a.float()
if case=="q_fp16": q=q.half()
if case=="state_noncontig": st=torch.randn(2*P,HV,V,K,device=d)[::2]
if case=="idx_noncontig": idx=torch.arange(2*B,dtype=torch.int32,device=d)[::2]
if case=="k_heads": k=torch.randn(B,1,H*2,K,dtype=torch.bfloat16,device=d)
if case=="state_cpu": st=st.cpu()
before = st.clone()
try:
    fn(q,k,v,a,b,A,dt,st,idx,o,0.1)
    torch.cuda.synchronize()
    print("NO ERROR; state changed:", not torch.equal(before, st))
except Exception as e:
    msg=str(e).replace("\n"," ")
    print(type(e).__name__, msg[-250:])
