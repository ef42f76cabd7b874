"""`merge push DIR --repo-id ORG/NAME`: publish an output folder to the Hugging Face Hub."""

from __future__ import annotations

import click


@click.command("push")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--repo-id", required=True, help="Target repository on the Hub, as ORG/NAME.")
@click.option("--private", is_flag=True, help="Create the repository as private (an existing repo keeps its visibility).")
@click.option("--revision", default="main", show_default=True, help="Branch to push to; created when it does not exist.")
@click.option("--commit-message", default=None, help="Commit message (default: 'Upload FOLDER with mergekit-ext').")
@click.option("--dry-run", is_flag=True, help="Check the folder and list the files and sizes that would be uploaded; send nothing.")
def push_command(folder: str, repo_id: str, private: bool, revision: str, commit_message: str | None, dry_run: bool) -> None:
    """Upload FOLDER (model card, config, weights) to the Hub repository --repo-id.

    The token comes from the HF_TOKEN environment variable or the login cache of
    `hf auth login`; it is never printed.
    """
    from mergekit_ext import hub

    plan = hub.plan_upload(folder, repo_id, revision=revision, private=private, commit_message=commit_message)
    if dry_run:
        click.echo(f"Dry run: would upload {plan.describe()}")
        return
    url = hub.push_folder(plan)
    click.echo(f"Pushed {len(plan.files)} files ({hub.format_bytes(plan.total_bytes)}) to {url}")
