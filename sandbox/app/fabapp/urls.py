from django.urls import path

from fabapp import views

urlpatterns = [
    path("", views.home),
    path("healthcheck.html", views.healthcheck),
    path("write-check", views.write_check),
]
