from django.shortcuts import render

from .models import Note


def index(request):
    """The front page: the latest notes."""
    return render(request, "notes/index.html", {"notes": Note.objects.all()[:20]})
