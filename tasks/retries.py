from wdsembed import faults


def retry_if_transient(task, task_run, state) -> bool:
    """The tasks' retry_condition_fn: tried again only where the failure may pass (faults.worth_retrying)."""
    return faults.worth_retrying(state.result(raise_on_failure=False))
