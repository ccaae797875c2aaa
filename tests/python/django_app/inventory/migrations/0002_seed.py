"""A data migration: inserts the seed item. Run twice, it would insert it twice.

DJANGO_SEED_SLEEP_SECONDS (default 0.5) makes it slow, like a real backfill.
"""

import os
import time

from django.db import migrations


def seed(apps, schema_editor):
    Item = apps.get_model("inventory", "Item")
    time.sleep(float(os.environ.get("DJANGO_SEED_SLEEP_SECONDS", "0.5")))
    Item.objects.create(name="seed")


def unseed(apps, schema_editor):
    apps.get_model("inventory", "Item").objects.filter(name="seed").delete()


class Migration(migrations.Migration):
    dependencies = [("inventory", "0001_initial")]

    operations = [migrations.RunPython(seed, unseed)]
