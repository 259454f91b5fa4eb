"""Models over the tables sandbox/seed_db.py creates (unmanaged), plus one the app migrates."""

from django.db import models


class User(models.Model):
    username = models.CharField(max_length=150, unique=True)
    email = models.CharField(max_length=254)
    first_name = models.CharField(max_length=150)
    last_name = models.CharField(max_length=150)
    password = models.CharField(max_length=128)
    is_staff = models.BooleanField()
    is_active = models.BooleanField()
    date_joined = models.DateTimeField()
    last_login = models.DateTimeField(null=True)

    class Meta:
        managed = False
        db_table = "auth_user"


class Order(models.Model):
    user = models.ForeignKey(User, on_delete=models.DO_NOTHING)
    status = models.CharField(max_length=20)
    total_cents = models.IntegerField()
    created = models.DateTimeField()
    note = models.TextField()

    class Meta:
        managed = False
        db_table = "shop_order"


class SiteNote(models.Model):
    text = models.CharField(max_length=200)
    created = models.DateTimeField(auto_now_add=True)
