"""Where a run reports: TensorBoard, Weights & Biases, or both (`--report_to tensorboard,wandb`).

train.py and tensorboard_views.py hand every scalar and picture to one `Reports`, which sends
each to both under the same name and step (`train/loss`, `val/rsum`, `val/similarity_heatmap`);
what only TensorBoard shows (the settings as text, HParams, the projector) is written to its
SummaryWriter, `Reports.tensorboard`. W&B's run has the run's name, the resolved settings as its
config, and the final and best metrics as its summary; its id is kept in the checkpoint
(TrainState.wandb_id), so that a resumed run continues the same W&B run.

Without an API key, or when W&B's servers cannot be reached, the W&B run is written offline
beside the TensorBoard events (`logs/<run>/wandb/offline-run-<time>-<id>/`, one folder for each
part of a resumed run), and the log says how to upload it: `wandb sync`. Only rank 0 reports.
"""
from dataclasses import dataclass
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from errors import SettingsError
from settings import comma_list


def import_wandb():
    """The wandb package, imported only by runs that report to W&B: it takes half a second."""
    try:
        import wandb
    except ImportError:
        raise SettingsError("report_to wandb: the wandb package is not installed; install it with "
                            "`.venv/bin/pip install wandb`, or leave wandb out of --report_to") from None
    return wandb


def check_report_to(cfg):
    """What the reports need is installed: a run without the wandb package stops before it loads
    its data, not at its first validation."""
    if "wandb" in comma_list(cfg.report_to):
        import_wandb()


@dataclass
class Reports:
    """The run's reports (rank 0): each is None unless report_to names it."""
    tensorboard: object = None     # torch's SummaryWriter into logs/<run>/
    wandb: object = None           # the W&B run

    def scalars(self, values, step):
        """{name: number} at a step, under the same names in both."""
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, name, pixels, step):
        """An RGB picture, (H, W, 3) uint8 (visualization.figure_pixels of a figure)."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(name, pixels, step, dataformats="HWC")
        if self.wandb is not None:
            self.wandb.log({name: import_wandb().Image(pixels)}, step=step)

    def summary(self, values):
        """The run's final and best numbers: W&B's summary, the columns of its table of runs
        (TensorBoard's HParams table shows the best ones: tensorboard_views.py)."""
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self, failed=False):
        """Flush and close; W&B marks a run that ended in an error as failed."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)


def open_reports(cfg, name, folder, log, wandb_id=None):
    """TensorBoard's writer and W&B's run as report_to asks; `wandb_id` is the W&B run to
    continue (the checkpoint's, on resume)."""
    targets = comma_list(cfg.report_to)
    writer = SummaryWriter(str(folder)) if "tensorboard" in targets else None
    wandb_run = start_wandb(cfg, name, folder, log, wandb_id) if "wandb" in targets else None
    return Reports(writer, wandb_run)


def start_wandb(cfg, name, folder, log, wandb_id):
    """The W&B run: online when there is an API key and W&B answers, else written offline."""
    wandb = import_wandb()
    options = dict(project=cfg.wandb_project, entity=cfg.wandb_entity or None,
                   tags=comma_list(cfg.wandb_tags) or None, name=name, config=vars(cfg), dir=folder,
                   # "allow": a run first written offline and not uploaded yet is created
                   id=wandb_id, resume="allow" if wandb_id else None,
                   allow_val_change=True)             # a resumed run's settings may change
    reason = offline_reason(wandb)
    if reason is None:
        try:
            wandb_run = wandb.init(**options)
        except wandb.errors.Error as error:            # no network, a key the server refuses
            reason = f"W&B could not be reached: {str(error).splitlines()[0]}"
    if reason is not None:
        wandb_run = wandb.init(mode="offline", **options)
    log.info(wandb_message(wandb_run, reason))
    return wandb_run


def offline_reason(wandb):
    """Why the W&B run is written offline without trying W&B's servers, or None: the user chose
    offline (WANDB_MODE=offline or `wandb offline`), or there is no API key (W&B would ask for one
    on the terminal, and a run must not wait for someone to type it)."""
    mode = wandb.setup().settings.mode
    if mode in ("offline", "dryrun"):
        return "offline mode, chosen by WANDB_MODE or `wandb offline`"
    if mode != "disabled" and not wandb.login(prompt=False, verify=False):
        return "no API key: `wandb login`, or WANDB_API_KEY"
    return None


def wandb_message(wandb_run, reason):
    if wandb_run.disabled:
        return "W&B is disabled (WANDB_MODE=disabled): the run is not recorded there"
    if wandb_run.offline:
        parts = Path(wandb_run.settings.sync_dir).parent / f"offline-run-*-{wandb_run.id}"
        return (f"W&B run written offline ({reason}) in {wandb_run.settings.sync_dir}; upload it, "
                f"with the parts of its resumed runs, with: wandb sync {parts}")
    return f"W&B: {wandb_run.url}"
