import time, jax, jax.numpy as jnp, numpy as np
from jax import lax
def t(f,*a,n=5):
    jax.block_until_ready(f(*a)); ts=[]
    for _ in range(n):
        s=time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter()-s)
    return round(float(np.median(ts))*1e3,2)
x = jnp.asarray(np.random.randn(64,32,32,16), jnp.float32)
w = jnp.asarray(np.random.randn(6,3,3,16,16), jnp.float32)*0.1
conv = lambda x,w: lax.conv_general_dilated(x,w,(1,1),((1,1),(1,1)),dimension_numbers=("NHWC","HWIO","NHWC"))
def unrolled(x,w):
    for i in range(6): x = jax.nn.relu(conv(x,w[i]))
    return x
def scanned(x,w):
    return lax.scan(lambda h, wi: (jax.nn.relu(conv(h,wi)), None), x, w)[0]
def fori(x,w):
    return lax.fori_loop(0,6,lambda i,h: jax.nn.relu(conv(h,w[i])), x)
for name,f in [("unrolled",unrolled),("scan",scanned),("fori",fori)]:
    print(name, "fwd", t(jax.jit(f),x,w), "grad", t(jax.jit(jax.grad(lambda x,w: jnp.sum(f(x,w)**2), argnums=(0,1))),x,w))
print("grad x only", t(jax.jit(jax.grad(lambda x,w: jnp.sum(scanned(x,w)**2), argnums=0)),x,w))
print("grad w only", t(jax.jit(jax.grad(lambda x,w: jnp.sum(scanned(x,w)**2), argnums=1)),x,w))
# manual: weight grad conv outside loop
def wgrad(x,g): return jax.vjp(lambda w: conv(x,w), w[0])[1](g)[0]
print("wgrad conv top", t(jax.jit(wgrad), x, x))
def wgrad_loop(xs,g):
    return lax.map(lambda xx: wgrad(xx,g), xs)
print("wgrad conv in map (6)", t(jax.jit(wgrad_loop), jnp.stack([x]*6), x))
