import sys
import jax, jax.numpy as jnp
sys.path.insert(0, '.')
from kernels_pallas import dense_decode_attention as dda
b, K, S, H, N = 32, 2, 640, 128, 32
pos_v = int(sys.argv[1]) if len(sys.argv) > 1 else 576
qkv = jax.random.normal(jax.random.key(0), (b, N + 2 * K, H)).astype(jnp.bfloat16)
ang = jax.random.uniform(jax.random.key(1), (b, H))
cos, sin = jnp.cos(ang).astype(jnp.bfloat16), jnp.sin(ang).astype(jnp.bfloat16)
ck = jax.random.normal(jax.random.key(2), (b, K, S, H)).astype(jnp.bfloat16)
cv = jax.random.normal(jax.random.key(3), (b, K, S, H)).astype(jnp.bfloat16)
pos = jnp.full((b,), pos_v, jnp.int32)
f = jax.jit(lambda ck, cv: dda.dense_decode_attention_rows(qkv, ck, cv, pos, cos, sin), donate_argnums=(0, 1))
for _ in range(3):
    o, ck, cv = f(ck, cv)
o.block_until_ready()
print("done", o.shape)
