"""modules.progress: task ids for the progress bar (recorded)."""

from modules import calls

current_task = None


def add_task_to_queue(id_task):
    calls.append(f"progress.queue({id_task})")


def start_task(id_task):
    global current_task
    current_task = id_task


def finish_task(id_task):
    global current_task
    current_task = None
