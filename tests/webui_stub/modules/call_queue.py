"""modules.call_queue: the lock every GPU job takes, and the wrappers (1.10 signatures)."""
import threading

from modules import shared

queue_lock = threading.Lock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            res = func(*args, **kwargs)
        return res
    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    def f(*args, **kwargs):
        with queue_lock:
            shared.state.begin(job=getattr(func, "__name__", "(unknown)"))
            try:
                res = func(*args, **kwargs)
            finally:
                shared.state.end()
        return res
    return f
