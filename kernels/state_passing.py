"""The state carry shared by the chunked Mamba-2 scan (state from chunk to chunk) and the Mamba-1 scan (from
time step to time step): state_{k+1} = decay_k * state_k + input_k as one autograd node, and the same ops in
place for calls without autograd, so both give the same bits."""

import torch


class StatePassing(torch.autograd.Function):
    """state_{k+1} = decay_k * state_k + chunk_states_k over the leading axis k (chunks here, time steps in
    the Mamba-1 scan), as one autograd node.

    chunk_states is (c, *S), chunk_decay (c, *D) with D broadcastable to S, initial_state S. Autograd through
    a Python loop would allocate a full-size gradient buffer per chunk (select backward); here forward and
    backward are each one loop of in-place updates. Returns the incoming state of every chunk (c, *S) and the
    final state.
    """

    @staticmethod
    def forward(ctx, chunk_states, chunk_decay, initial_state):
        c = chunk_states.shape[0]
        incoming = torch.empty_like(chunk_states)  # with chunk_states' strides
        if c:
            incoming[0] = initial_state
        for k in range(c - 1):  # one fused pass per chunk
            torch.addcmul(chunk_states[k], incoming[k], chunk_decay[k], out=incoming[k + 1])
        state = torch.addcmul(chunk_states[-1], incoming[-1], chunk_decay[-1]) if c else initial_state.clone()
        ctx.save_for_backward(chunk_decay, incoming)
        return incoming, state

    @staticmethod
    def backward(ctx, grad_incoming, grad_final):
        chunk_decay, incoming = ctx.saved_tensors
        grad_states = torch.empty_like(incoming)
        grad_decay = torch.empty_like(chunk_decay)
        grad = grad_final.clone(memory_format=torch.contiguous_format)  # w.r.t. the state after chunk k, walking back
        for k in reversed(range(incoming.shape[0])):
            grad_states[k] = grad
            grad_decay[k] = (grad * incoming[k]).sum_to_size(chunk_decay.shape[1:])
            grad.mul_(chunk_decay[k]).add_(grad_incoming[k])
        return grad_states, grad_decay, grad


def pass_states_(slots, carry):
    """StatePassing's forward in place, for calls without autograd: slots (c + 1, *S) hold the incoming state,
    then each chunk's contribution; afterwards slot k is the state entering chunk k and slot c the final one.
    No copy and no fresh buffer, and the same op as StatePassing, so the same bits."""
    for k in range(carry.shape[0]):
        slots[k + 1].addcmul_(slots[k], carry[k])
    return slots
