"""``riskpipe review``: serve the human review console."""

from __future__ import annotations

import click


@click.command()
@click.option("--ledger", "ledger_path", help="Ledger file the queue and verdicts live in (or `ledger:` in --config).")
@click.option("--bootstrap-servers", help="Kafka bootstrap servers: read the review topic, publish verdicts.")
@click.option("--review-topic", help="Trusted topic with full decision records.  [default: review]")
@click.option("--outcomes-topic", help="Topic the verdicts go to.  [default: review-outcomes]")
@click.option("--host", help="Address to listen on.  [default: 127.0.0.1]")
@click.option("--port", type=click.IntRange(0, 65535), help="Port; 0 picks a free one.  [default: 0]")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="riskpipe.yaml (reads its `review:` section).")
@click.option("--password-file", type=click.Path(dir_okay=False),
              help="File whose first line is the shared reviewer password (else RISKPIPE_REVIEW_PASSWORD).")
def review(**options):
    """Serve the review console: the queue, each item with its certificate, and verdicts.

    Reviewers log in with a password from --password-file, RISKPIPE_REVIEW_PASSWORD or
    the config file's review.users / review.password; there is no default credential.
    """
    from riskpipe.cli import review_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    review_impl.review(**options)
