"""Model building blocks: tensor-parallel linears, embeddings, rotary embedding, norms, activations."""
