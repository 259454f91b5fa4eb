# The seeded tables (sandbox/seed_db.py records this migration as applied).
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies: list = []

    operations = [
        migrations.CreateModel(
            name="User",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("username", models.CharField(max_length=150, unique=True)),
                ("email", models.CharField(max_length=254)),
                ("first_name", models.CharField(max_length=150)),
                ("last_name", models.CharField(max_length=150)),
                ("password", models.CharField(max_length=128)),
                ("is_staff", models.BooleanField()),
                ("is_active", models.BooleanField()),
                ("date_joined", models.DateTimeField()),
                ("last_login", models.DateTimeField(null=True)),
            ],
            options={"db_table": "auth_user", "managed": False},
        ),
        migrations.CreateModel(
            name="Order",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("status", models.CharField(max_length=20)),
                ("total_cents", models.IntegerField()),
                ("created", models.DateTimeField()),
                ("note", models.TextField()),
                ("user", models.ForeignKey(on_delete=models.DO_NOTHING, to="shop.user")),
            ],
            options={"db_table": "shop_order", "managed": False},
        ),
    ]
