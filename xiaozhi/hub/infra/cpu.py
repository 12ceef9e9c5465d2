"""How the hub's process uses the machine's cores."""

from __future__ import annotations


def one_blas_thread() -> None:
    """Keep this process's BLAS (numpy's and scipy's OpenBLAS) to one thread; the hub calls it as it starts.

    OpenBLAS starts a thread per core and, after every product it shares out, keeps them spinning on the
    other cores waiting for the next. Every answer multiplies a query vector by the knowledge base's
    vectors, often enough that the spinning thread never sleeps: measured during 10 paced chat sessions
    it burned 92 ms of CPU per message (more than the answer itself) on the core that Rasa, the action
    server and the hub's other threads need, and a niced knowledge-base build worker got 3-12 % of it
    (bench/kb_publish.py). One thread costs an answer nothing measurable (a 95,155 x 384 product: about
    13 ms either way); the hub's concurrent chats run in threads of their own.
    """
    import threadpoolctl

    # threadpoolctl (3.8 here) lets only the first thread that set OpenBLAS's pool size change it and silently
    # ignores every other thread; the hub may start in any thread (a test's, an embedding application's),
    # so this one takes over, as the library documents for that case.
    owner = getattr(threadpoolctl, "OpenBLASController", None)
    if owner is not None and hasattr(owner, "clear_controlling_thread"):
        owner.clear_controlling_thread(force=True)
    threadpoolctl.threadpool_limits(1, user_api="blas")
