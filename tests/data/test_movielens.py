"""MovieLens loaders on small files written in the exact GroupLens formats, and the packaged ML-100K."""

import gzip

import pytest

from fellrec.data.io import BadLines
from fellrec.data.movielens import load_recbole_ml100k
from fellrec.data.registry import load_dataset
from fellrec.errors import ConfigError, DataError

GENRE_FLAGS = {"Toy Story (1995)": [3, 4, 5], "GoldenEye (1995)": [1, 2, 16]}


def u_item_line(item, title, date, flags):
    bits = ["1" if i in flags else "0" for i in range(19)]
    return "|".join([str(item), title, date, "", f"http://us.imdb.com/M/title-exact?{item}", *bits])


@pytest.fixture
def ml100k_dir(tmp_path):
    d = tmp_path / "ml-100k"
    d.mkdir()
    (d / "u.data").write_text("196\t1\t3\t881250949\n186\t2\t4\t881250949\n196\t2\t5\t881250949\n"
                              "186\t3\t1\t881250000\n")
    items = [u_item_line(1, "Toy Story (1995)", "01-Jan-1995", [3, 4, 5]),
             u_item_line(2, "GoldenEye (1995)", "01-Jan-1995", [1, 2, 16]),
             u_item_line(3, "Misérables, Les (1995)", "01-Jan-1995", [8, 12]),
             u_item_line(267, "unknown", "", [0])]
    (d / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    (d / "u.user").write_text("186|39|F|executive|00000\n196|49|M|writer|55105\n")
    return d


def test_ml100k_raw(ml100k_dir):
    ds = load_dataset("ml-100k", ml100k_dir)
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (2, 3, 4)  # item 267 has no rating
    items = ds.items.set_index("item_id")
    assert items.loc[3, "title"] == "Misérables, Les (1995)"  # latin-1 decoded
    assert items.loc[1, "genres"] == ("Animation", "Children's", "Comedy")
    assert items.loc[2, "year"] == 1995
    users = ds.users.set_index("user_id")
    assert users.loc[196, "occupation"] == "writer" and users.loc[196, "age"] == 49
    inter = ds.interactions
    # time order; the three ratings at 881250949 keep their file order (196:1, 186:2, 196:2)
    orig = [(int(ds.users.user_id[u]), int(ds.items.item_id[i]))
            for u, i in zip(inter.user, inter.item, strict=True)]
    assert orig == [(186, 3), (196, 1), (186, 2), (196, 2)]
    assert inter.rating.tolist() == [1.0, 3.0, 4.0, 5.0]


def test_ml100k_unknown_item_names_line(ml100k_dir):
    with open(ml100k_dir / "u.data", "a") as fh:
        fh.write("186\t999\t3\t881250950\n")
    with pytest.raises(DataError, match=r"u\.data:5: unknown item 999"):
        load_dataset("ml-100k", ml100k_dir)
    bad = BadLines(skip=True)
    ds = load_dataset("ml-100k", ml100k_dir, bad=bad)
    assert len(ds.interactions) == 4 and bad.total == 1
    assert any("skipped 1 bad line" in n for n in ds.notes)


def test_ml100k_non_numeric_timestamp(ml100k_dir):
    (ml100k_dir / "u.data").write_text("196\t1\t3\t881250949\n186\t2\t4\tlast-tuesday\n")
    with pytest.raises(DataError, match=r"u\.data:2: column 'timestamp': 'last-tuesday' is not a number"):
        load_dataset("ml-100k", ml100k_dir)


def test_ml100k_missing_file(ml100k_dir):
    (ml100k_dir / "u.user").unlink()
    with pytest.raises(DataError, match=r"u\.user: file not found"):
        load_dataset("ml-100k", ml100k_dir)


def test_ml1m(tmp_path):
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978300760\n")
    (d / "movies.dat").write_bytes("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                                   "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
                                   "2::Astérix: Le Film (1989)::Comedy\n".encode("latin-1"))
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    ds = load_dataset("ml-1m", d)
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (2, 2, 3)
    items = ds.items.set_index("item_id")
    assert items.loc[661, "genres"] == ("Animation", "Children's", "Musical")
    assert items.loc[1193, "year"] == 1975
    users = ds.users.set_index("user_id")
    assert users.loc[2, "age"] == 56 and users.loc[2, "occupation"] == 16 and users.loc[1, "gender"] == "F"
    assert ds.interactions.timestamp.tolist() == [978300760.0, 978300760.0, 978302109.0]


def test_ml1m_malformed_line(tmp_path):
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3\n")
    (d / "movies.dat").write_text("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n")
    (d / "users.dat").write_text("1::F::1::10::48067\n")
    with pytest.raises(DataError, match=r"ratings\.dat:2: expected 4 fields, got 3"):
        load_dataset("ml-1m", d)


@pytest.mark.parametrize("gz", [False, True])
def test_ml_csv(tmp_path, gz):
    d = tmp_path / "ml-latest-small"
    d.mkdir()
    ratings = "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n2,1,0.5,964982224\n"
    movies = ("movieId,title,genres\n1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
              '3,"American President, The (1995)",Comedy|Drama|Romance\n'
              "5,Some Film,(no genres listed)\n")
    if gz:  # a user may gzip the files; content decides, not the name
        with gzip.open(d / "ratings.csv", "wt") as fh:
            fh.write(ratings)
    else:
        (d / "ratings.csv").write_text(ratings)
    (d / "movies.csv").write_text(movies)
    ds = load_dataset("ml-csv", d)
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (2, 2, 3)
    items = ds.items.set_index("item_id")
    assert items.loc[3, "title"] == "American President, The (1995)"
    assert items.loc[3, "genres"] == ("Comedy", "Drama", "Romance")
    assert ds.interactions.rating.tolist() == [4.5, 0.5, 4.0]  # sorted by time


def test_ml_csv_missing_column(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "ratings.csv").write_text("userId,movieId,rating\n1,1,4.0\n")
    (d / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Comedy\n")
    with pytest.raises(DataError, match=r"ratings\.csv:1: missing column\(s\) 'timestamp'"):
        load_dataset("ml-csv", d)


def title_notes(ds) -> list[str]:
    return [n for n in ds.notes if "no title" in n]


def test_ml_csv_movie_without_title_is_kept_named_by_id(tmp_path):
    """An empty title is a data-quality fact, not a broken file: the movie stays, named by its id, and
    one note counts such movies and names the first one's line."""
    d = tmp_path / "ml-latest-small"
    d.mkdir()
    (d / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Comedy\n9,,Drama\n"
                                  '3,"  ",Comedy\n4,,Drama\n')  # 4: never rated, so not counted
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,10\n1,3,4.5,11\n2,9,3.0,12\n"
                                   "2,1,1.0,bad\n")
    bad = BadLines(skip=True)  # a later real defect is still found
    ds = load_dataset("ml-csv", d, bad=bad)
    assert bad.total == 1 and len(ds.interactions) == 3
    titles = dict(zip(ds.items.item_id, ds.items.title, strict=True))
    assert titles == {1: "Toy Story (1995)", 3: "item 3", 9: "item 9"}
    assert title_notes(ds) == ["2 items have no title and are named by their id instead ('item 9', ...); the "
                               f"first is at {d / 'movies.csv'}:3"]
    with pytest.raises(DataError, match=r"ratings\.csv:5: column 'timestamp': 'bad' is not a number"):
        load_dataset("ml-csv", d)


def test_ml100k_and_ml1m_movie_without_title(ml100k_dir, tmp_path):
    items = (ml100k_dir / "u.item").read_bytes().decode("latin-1").splitlines()
    items[1] = u_item_line(2, "", "01-Jan-1995", [1])
    (ml100k_dir / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    ds = load_dataset("ml-100k", ml100k_dir)
    assert ds.items.set_index("item_id").loc[2, "title"] == "item 2"
    assert title_notes(ds) == ["1 item has no title and is named by its id instead ('item 2'); it is at "
                               f"{ml100k_dir / 'u.item'}:2"]

    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    (d / "movies.dat").write_text("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::::Animation\n")
    (d / "users.dat").write_text("1::F::1::10::48067\n")
    ds = load_dataset("ml-1m", d)
    items = ds.items.set_index("item_id")
    assert items.loc[661, "title"] == "item 661" and items.loc[661, "genres"] == ("Animation",)
    assert title_notes(ds) == ["1 item has no title and is named by its id instead ('item 661'); it is at "
                               f"{d / 'movies.dat'}:2"]


def test_recbole_layout_movie_without_title(tmp_path):
    d = tmp_path / "ml-100k"
    d.mkdir()
    (d / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                     "1\t5\t3\t10\n1\t6\t4\t11\n")
    (d / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                    "5\tHeat\t1995\tAction\n6\t\t1996\tDrama\n")
    (d / "ml-100k.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
                                    "1\t30\tF\twriter\t00000\n")
    ds = load_recbole_ml100k(d, bad=BadLines())
    assert dict(zip(ds.items.item_id, ds.items.title, strict=True)) == {5: "Heat (1995)", 6: "item 6"}
    assert title_notes(ds) == ["1 item has no title and is named by its id instead ('item 6'); it is at "
                               f"{d / 'ml-100k.item'}:3"]


def test_unknown_format_and_missing_path():
    with pytest.raises(ConfigError, match=r"unknown format 'ml-2k'"):
        load_dataset("ml-2k", None)
    with pytest.raises(ConfigError, match=r"data\.path: format 'ml-1m' needs a path"):
        load_dataset("ml-1m", None)


def test_packaged_ml100k():
    ds = load_dataset("ml-100k-recbole", None)
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (943, 1682, 100_000)
    items = ds.items.set_index("item_id")
    assert items.loc[1, "title"] == "Toy Story (1995)"
    assert items.loc[543, "title"] == "Misérables, Les (1995)"
    assert items.loc[267, "title"] == "unknown"
    assert items.loc[1, "genres"] == ("Animation", "Children's", "Comedy")
    assert set(ds.users.columns) == {"user", "user_id", "age", "gender", "occupation", "zip_code"}
    assert ds.users.occupation.nunique() == 21
    ts = ds.interactions.timestamp.to_numpy()
    assert (ts[1:] >= ts[:-1]).all()
    assert ds.summary()["same_timestamp_share"] > 0.5


def test_packaged_ml100k_ties_keep_file_order():
    """Half of ML-100K's ratings share a timestamp with another of the same user; the order of
    such ratings must be the file's, so compare with an independent sort by (time, line)."""
    from fellrec.data.movielens import recbole_ml100k_dir

    lines = (recbole_ml100k_dir() / "ml-100k.inter").read_text().splitlines()[1:]
    rows = [tuple(line.split("\t")) for line in lines]
    order = sorted(range(len(rows)), key=lambda i: (float(rows[i][3]), i))
    expected = [(int(rows[i][0]), int(rows[i][1])) for i in order]
    ds = load_dataset("ml-100k-recbole", None)
    got = list(zip(ds.users.user_id.to_numpy()[ds.interactions.user].tolist(),
                   ds.items.item_id.to_numpy()[ds.interactions.item].tolist(), strict=True))
    assert got == expected
